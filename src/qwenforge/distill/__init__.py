"""Distillation: the engine (`engine`: divergences and the loop), the teacher (`teacher`: live or stored,
one interface), the top-k logit store (`store`: layout and codec) and `capture` (`qwenforge distill
capture`), student training (`train`) and layer-subset students (`init_student`). `qwenforge heal` and
`qwenforge distill` both run `engine.run_loop` on a `teacher`.
"""
