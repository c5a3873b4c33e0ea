"""Reliability suites: load, crashes, outages, hostile input and security.

Run them with ``pytest tests/reliability -s`` to see each test's figures as
it runs; a one-line summary per suite is printed at the end either way.
"""
