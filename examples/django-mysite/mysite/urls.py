"""
URL configuration for mysite project.

The `urlpatterns` list routes URLs to views. For more information please see:
    https://docs.djangoproject.com/en/5.2/topics/http/urls/
"""
from django.contrib import admin
from django.urls import path

from mysite import views

urlpatterns = [
    path('', views.home, name='home'),
    path('admin/', admin.site.urls),
]
