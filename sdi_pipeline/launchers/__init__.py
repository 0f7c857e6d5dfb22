"""Launchers: how the query job, the workers and the merge get run (same code everywhere)."""
