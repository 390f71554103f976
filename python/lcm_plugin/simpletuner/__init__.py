"""The SimpleTuner adapter. `install.py` lists every change made to SimpleTuner and applies them; the change groups
live in `data_path_patches.py`, `run_output_patches.py`, `family_patches.py` and `quality_check_patches.py`, on the
shared `surfaces.py` (finding SimpleTuner's objects) and `run_config.py` (the run's LCM settings); `distiller.py` is
the LCM distiller SimpleTuner's trainer calls.

Importing this package imports nothing heavy; import `lcm_plugin.simpletuner.install` to patch.
"""
