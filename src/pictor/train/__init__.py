"""pictor.train"""
