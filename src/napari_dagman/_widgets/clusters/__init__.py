"""The organ clusters dock: patch embeddings, the linked scatter, cluster quality."""
