"""The bundled toy models and their wing: procedural and photo videos, tiny-wan and small-wan,
their training and model cards, the CPU demo, video metrics and attention statistics."""
