"""REST routers grouped by resource, and the HTML pages."""
