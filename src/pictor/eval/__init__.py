"""pictor.eval"""
