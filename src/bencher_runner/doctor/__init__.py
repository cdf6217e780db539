"""`runner doctor`: what this host can run and how quiet it is (checks.py), and the persistent fixes
for what it lacks (fixes.py). Above sandbox/ and host/: it probes both."""
