"""Helpers shared by the tests: free ports, real servers started as child processes."""
