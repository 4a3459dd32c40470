"""ske2grid"""
