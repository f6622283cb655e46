"""LongCoT cold-start data (SPEC §4.3.1): collect questions, generate several reasoning paths per question,
grade them on two levels, send the doubtful ones to people, score what is kept, and publish an SFT table.

One module per step; each step is a plain function over Lance tables (no Prefect here;
``keyeflow/tasks/longcot.py`` wraps each one) and every path, drop, verdict and decision stays in a table
with its reason:

1. ``collect``: multi-source collection and question enhancement → ``longcot_questions``.
2. ``generate``: several paths per question, their confidence and answer-level verdict, and the selection
   of diverse correct paths → ``longcot_paths``; also the prompts, media lookup and generators.
3. ``assess``: the process level by a judge, and the grade A, B (or borderline A) for review, or C.
4. ``review``: a person's or a policy's decision on every B and borderline A → ``longcot_reviews``.
5. ``score``: the 1–5 quality score and the training repeats.
6. ``gates``: the frames the gate checks read, and the gate runs; ``publish``: the ``longcot`` table, one
   row per kept sample, messages ready for SFT.

``common`` holds what several steps share; ``rl_items`` builds post-training's RL items from the collected
questions.

A path's ``status`` moves selected → review → kept, or to dropped at any step (``stage`` says where,
``reason`` why). Path ids are ``<question_id>/<generation config hash>/<k>``: a rerun with the same settings
finds its paths and generates nothing; a question whose generation failed is tried again.

Layer: above ``datasets`` and ``quality`` (graders, judges, rewards), below ``training``.
"""
