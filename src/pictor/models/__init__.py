"""pictor.models"""
