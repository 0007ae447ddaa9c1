"""The REST API's routers (FastAPI), one module per area; app.py includes them all."""
from __future__ import annotations

from . import access, jobs, machines, plans, policies, topology

ROUTERS = (topology.router, policies.router, machines.router, jobs.router, plans.router, access.router)
