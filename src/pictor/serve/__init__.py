"""pictor.serve"""
