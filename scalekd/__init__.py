"""scalekd"""
