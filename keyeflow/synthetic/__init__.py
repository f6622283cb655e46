"""Generated sample data, verifiable tasks and the synthetic LongCoT teacher, for demos, tests and
``keyeflow run``.

Nothing here is shipped as binary data or downloaded: clips come from ffmpeg's own sources (``videos``),
pictures are drawn with Pillow (``images``), conversations, captions and plain text are filled from seeded
templates (``corpus``; its word and phrase lists are package data under ``assets/``, read by ``vocabulary``),
LongCoT questions are written out with reference solutions (``longcot_questions``), verifiable task families
are drawn with their ground truth (``verifiable_tasks``: shape counts in pictures, shot order in clips), and a
local OpenAI-compatible server, the synthetic teacher, writes reasoning paths from those solutions with
seeded, documented errors (``synthetic_teacher``).

This package sits beside the domain, not in it: keyeflow's data, quality, training and flow code never imports
it (only ``keyeflow.cli``, tests, benchmarks and scripts do), so the pipeline runs the same on real data.
"""
