"""The web app's pages: one module per tab (``build`` lays the tab out and wires its events; its handlers
beside it), the shared plumbing in ``ui.common``. ``app.py`` assembles them. Importing any of these builds
nothing: the studio context is made on first use (``ui.common.studio``)."""
