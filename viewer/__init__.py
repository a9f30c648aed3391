"""The read-only web viewer over a state repo and its storage (not built yet)."""
