"""`make demo`: the seed's story told by greupd in a real-kernel lab (seed_story.py, black_hole.py)."""
