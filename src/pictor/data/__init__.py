"""pictor.data"""
