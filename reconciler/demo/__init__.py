"""The demo pipeline that `winslow demo` runs: a vehicle tracker (vehicles.py) and the picture it draws (plot.py)."""

SCRIPTS = ("vehicles.py", "plot.py")  # copied together into the storage pool, where the stages run vehicles.py
