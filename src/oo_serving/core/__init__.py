"""The learning core: pure numpy, no I/O, no clock, no logging.

Given a model state and candidate vectors it returns a decision; given a state, a
vector and a reward it returns the new state. Everything here is a pure function or a
small frozen dataclass.
"""
