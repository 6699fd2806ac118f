"""The plan: WEST threshold codes (``topology``), the Plan and its FAST schedule (``plan``), the
file format (``io``, ``schema``), model fingerprints (``fingerprint``) and pictures (``viz``)."""
