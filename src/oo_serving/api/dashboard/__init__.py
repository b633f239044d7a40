"""The operator dashboard at /dashboard: server-rendered HTML and inline SVG charts.

    data.py        what is shown, read from the service into plain values
    evaluation.py  the latest saved `oo-serving evaluate` result, read back
    svg.py         the charts
    pages.py       the HTML
    style.py       the stylesheet
    access.py      API keys: Bearer, or HTTP Basic for a browser
    routes.py      the routes

Everything a page needs is served by the service itself: it works without internet.
"""

from oo_serving.api.dashboard.routes import dashboard_router

__all__ = ["dashboard_router"]
