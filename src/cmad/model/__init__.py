"""The detector and its branches."""
