"""The audio pipeline: sources → audio → features, streamed through Ray Data."""
