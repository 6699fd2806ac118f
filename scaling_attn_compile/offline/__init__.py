"""Offline plan building: dense calibration runs (``calibrate``), WEST topology (``west``),
FAST schedule (``fast``) and training-free anchor plans (``anchors``)."""
