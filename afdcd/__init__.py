"""afdcd"""
