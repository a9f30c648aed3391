"""The demo pipeline that `winslow demo` runs: a self-contained vehicle tracker (vehicles.py)."""
