"""gridconv"""
