"""Distillation: the engine (`engine`), the top-k logit store (`store`), student training (`train`) and
layer-subset students (`init_student`). `qwenforge heal` and `qwenforge distill` both run `engine.run_loop`.
"""
