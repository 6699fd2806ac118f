"""The mask contract every layer shares: the block format and bucket rule (``masks``), the
readable spec of the op (``reference``), materialised tables (``tables``) and token orders."""
