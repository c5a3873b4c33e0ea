"""Benchmarks of flask_serverside; see benchmarks/README.md."""
