"""Stand-ins for foreign programs that cannot run on the test machines (test code only)."""
