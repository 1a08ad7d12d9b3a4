"""The dashboard page (placeholder, replaced below)."""

DASHBOARD_HTML = "<!doctype html><title>trainbox</title><p>trainbox</p>"
