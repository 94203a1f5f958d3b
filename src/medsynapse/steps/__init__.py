"""The steps the commands are built from, below every driver: `prepare` (a real run file's convert -> cache, recorded
in OUTPUT/prepare.json) and `synthmed` (SynthMed's data, tiny VLM, base preparation and prior encoder, cached by
content key). The drivers (`demo.py`, `study.py`) call these steps; no step imports a driver, and no driver imports
another (tests/test_layers.py)."""
