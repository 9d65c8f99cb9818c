"""Attack evaluation, importable as ``securefed.attacks``.

Attacks accept only a ``ServerView``: what an honest-but-curious server holds
after a round under the configured protocol, plus declared public knowledge.
"""
