"""The VMM runtime shared by every backend (DESIGN §2, §4): see runtime.py for what it owns
and driver.py for the little a VMM supplies."""
