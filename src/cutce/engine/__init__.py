"""What a head computation is and how it will run: options, the problem, the planner.

Pure description and decisions: nothing here launches a kernel or imports a backend.
"""
