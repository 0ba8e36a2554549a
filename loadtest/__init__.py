"""Locust load tests of the service (locustfile.py) and their headless runner and reports (python -m loadtest)."""

REFUSED = " (refused: busy)"   # appended to a request's name when a busy service refused it (503 with Retry-After)
