"""The offline demo behind `simpletuner-lcm demo`.

A tiny SDXL-architecture teacher that draws coloured shapes from prompts ("a red circle") is
distilled into an LCM-LoRA by the real SimpleTuner trainer; the demo then compares teacher DDIM
and student LCM samples in a labelled grid and a metric table.

Modules: `shapes` (the synthetic dataset), `teacher` (the shipped teacher weights), `config`
(SimpleTuner config derived from the seed), `sampling`, `metrics`, `grid`, `run` (orchestration).
"""
