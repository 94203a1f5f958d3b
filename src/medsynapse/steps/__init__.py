"""The steps the commands are built from, below every driver: `chain` (a run file's convert -> cache -> Stage I ->
II -> III -> eval, resumable through OUTPUT/pipeline.json; `medsynapse pipeline` is this chain) and `synthmed`
(SynthMed's data, tiny VLM, base preparation and prior encoder, cached by content key). The drivers (`demo.py`,
`study.py`) call these steps; no step imports a driver, and no driver imports another (tests/test_layers.py)."""
