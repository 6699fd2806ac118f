"""The ``torch.compile`` pass: the backend (``backend``), the FX rewrite (``rewrite``), the token
order step, Ulysses heads (``parallel``), the Inductor lowering and its template source."""
