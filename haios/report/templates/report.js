(function () {
  "use strict";
  var text = document.getElementById("audit-filter");
  var kind = document.getElementById("audit-kind");
  var shown = document.getElementById("audit-shown");
  if (!text || !kind || !shown) { return; }
  var rows = document.querySelectorAll("#audit-table tbody tr");
  function apply() {
    var query = text.value.toLowerCase();
    var wanted = kind.value;
    var count = 0;
    for (var i = 0; i < rows.length; i++) {
      var row = rows[i];
      var match = (!wanted || row.getAttribute("data-kind") === wanted) &&
        (!query || row.textContent.toLowerCase().indexOf(query) !== -1);
      row.hidden = !match;
      if (match) { count++; }
    }
    shown.textContent = String(count);
  }
  text.addEventListener("input", apply);
  kind.addEventListener("change", apply);
}());
