"""The application: the fxgndi command, the demo, data specs, model loading and the digits
model zoo. The top room: it may import every other."""
