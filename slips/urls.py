"""Parents' pages, reached from signed links in their emails."""

urlpatterns: list = []
