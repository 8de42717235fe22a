"""The attention & mask explorer: the dock, its controls and words, its tiles, figures, layers and organ panel."""
