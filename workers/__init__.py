"""Processes, and nothing about mail: the master (arbiter), its workers and its services."""
