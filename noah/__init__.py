"""noah"""
