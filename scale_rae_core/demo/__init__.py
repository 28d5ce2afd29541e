"""The embedded default, end to end: the shapes world through every stage srae has, on the tiny profile (`srae demo`).

    synth → pack → inspect → verify → decoder → stat → dit → stage1 [→ stage2] → model → generate → understand
          → scale → eval → report

``dit`` is RAE's stage 2 on the same latents (``class_dit``): a class-conditional DiT^DH on the world's 12 colour x
shape classes, its samples judged by the shapes reader.

Two recipes train the model: the quick one (the profile as it is: ~14 minutes on 2 cores) and the recipe of the
model that ships with the package, ``run.BUNDLED_RECIPE`` (stage 1 three times as long, then a stage-2 finetune on the
same data: ~37 minutes). ``srae demo --retrain`` runs the second; ``install.install_bundled`` then puts the result
in the package as the default ``--model`` (``--install``), with its provenance and benchmark in ``ABOUT.json``.

Every stage (``stages.STAGES``) writes into one run folder (``OUT/<stage output>``) and keeps a record in
``OUT/stages/<name>.json`` (``records``): ``{"status": "running" | "done", "inputs": ..., "info": ...}``.
``inputs`` are the settings the stage's output depends on (its profile section, the demo options it reads) plus
the ``stamp`` of each stage it needs, so a stage that ran again (in this or an earlier invocation) invalidates
what read its old output. On a re-run (``run.run_demo``) a stage is **reused** when its record is done, its
inputs are unchanged and its outputs are still on disk; a stage whose record says "running" with the same inputs
was interrupted and **continues** (the trainers resume from their last checkpoint, the scaling loop from its last
sample); anything else **starts over** (its output folder is deleted first). ``redo`` names stages to start over
whatever their state; everything that needs them follows.

Quality: ``bars.QUALITY_BARS`` lists the numbers the demo must reach (stage, key in that stage's info, minimum).
They are checked at the end and written to ``demo.json``; ``strict`` turns a miss into an error. Tighten a bar
by editing its minimum; add one by naming a stage and a key its info already reports.

``report`` turns the run folder into ``report.html`` (drawn by ``page``).
"""
