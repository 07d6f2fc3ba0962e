// scanagent viewer: the scan as points coloured by anomaly score, the agent's regions outlined and numbered as in
// report.json, a side panel with their reasons and verdicts, and picking (click a point: its score and regions).
// Reads its data from the page's <script id="scan-data" type="application/json">; needs the global THREE bundle.
(function () {
  "use strict";
  const status = document.getElementById("status");
  function setStatus(state, text) {
    document.body.dataset.status = state;
    status.textContent = text;
  }
  function decode(base64, Type) {
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    return new Type(bytes.buffer);
  }
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text; // never innerHTML: reasons are model-written text
    return node;
  }
  const fmt = (v) => (v === null || v === undefined ? "–" : Number(v).toPrecision(4));

  const data = JSON.parse(document.getElementById("scan-data").textContent);
  const n = data.shown_points;
  const quantised = decode(data.positions, Uint16Array);
  const scores = decode(data.scores, Float32Array);
  const inputIndex = decode(data.input_index, Int32Array);
  const lo = data.bbox_min, span = data.bbox_span, centre = [0, 1, 2].map((a) => lo[a] + span[a] / 2);
  const positions = new Float32Array(3 * n);
  for (let i = 0; i < 3 * n; i++) {
    const a = i % 3;
    positions[i] = lo[a] + (quantised[i] / 65535) * span[a] - centre[a];
  }
  // The colour table is sRGB (as in scores.ply and regions.png); three.js blends in linear light and converts back.
  const toLinear = (c) => (c <= 0.04045 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4));
  const table = data.colour_table.map((rgb) => rgb.map((c) => toLinear(c / 255)));
  const colours = new Float32Array(3 * n);
  const low = data.score_min, range = data.score_max - data.score_min;
  for (let i = 0; i < n; i++) {
    const t = range > 0 ? (scores[i] - low) / range : 0;
    colours.set(table[Math.min(255, Math.max(0, Math.round(t * 255)))], 3 * i);
  }
  const regionsOf = new Map(); // shown point -> region numbers
  const regions = data.regions.map((region) => {
    const members = decode(region.members, Int32Array);
    members.forEach((i) => { if (!regionsOf.has(i)) regionsOf.set(i, []); regionsOf.get(i).push(region.id); });
    return Object.assign({}, region, { members: members });
  });

  // --- header and side panel ---
  const report = data.report;
  document.getElementById("title").textContent = data.title;
  const summary = document.getElementById("summary");
  const facts = [
    ["verdict", report.summary || (report.verdict || "no verdict")],
    ["object score", fmt(report.object_score) + (report.threshold !== null && report.threshold !== undefined
      ? " (threshold " + fmt(report.threshold) + ")" : "")],
    ["verified", (100 * report.verified_fraction).toFixed(1) + "% of " + report.n_points + " points"],
    ["backend", report.backend + (report.fallback && report.fallback.used ? " → fallback " + report.reporting_backend : "")],
    ["shown", n === report.n_points ? "all " + n + " points"
      : n + " of " + report.n_points + " points (deterministic subsample, seed " + data.seed +
        "; every region point kept first)"],
  ];
  if (report.fallback && report.fallback.used) facts.push(["fallback reason", report.fallback.reason]);
  if (report.registration && report.registration.doubtful) {
    facts.push(["registration", "doubtful (fitness " + fmt(report.registration.fitness) + "): every score is suspect"]);
  }
  facts.forEach(([key, value]) => {
    const row = el("div", "fact");
    row.append(el("span", "key", key), el("span", "value", value));
    summary.append(row);
  });
  const list = document.getElementById("regions");
  if (!regions.length) list.append(el("li", "empty", "no regions named"));

  // --- scene ---
  const canvasHost = document.getElementById("view");
  let renderer;
  try {
    renderer = new THREE.WebGLRenderer({ antialias: true, alpha: true, preserveDrawingBuffer: true });
  } catch (error) {
    setStatus("no-webgl", "WebGL is not available in this browser: " + error.message);
    return;
  }
  renderer.setPixelRatio(window.devicePixelRatio || 1);
  renderer.setClearColor(0x000000, 0); // transparent: the page's background shows through, exactly
  canvasHost.append(renderer.domElement);
  const scene = new THREE.Scene();
  const extent = Math.max(span[0], span[1], span[2], 1e-9);
  const camera = new THREE.PerspectiveCamera(40, 1, extent / 1000, extent * 100);
  camera.up.set(0, 0, 1); // scans are z-up (as regions.png's views assume)
  camera.position.set(extent * 1.1, -extent * 1.6, extent * 0.9);
  const controls = new THREE.OrbitControls(camera, renderer.domElement);
  controls.enableDamping = false;

  const geometry = new THREE.BufferGeometry();
  geometry.setAttribute("position", new THREE.BufferAttribute(positions, 3));
  geometry.setAttribute("color", new THREE.BufferAttribute(colours, 3));
  const material = new THREE.PointsMaterial({ size: 3, sizeAttenuation: false, vertexColors: true });
  const cloud = new THREE.Points(geometry, material);
  scene.add(cloud);

  const STYLE = data.verdict_styles; // the same outline colours and dashes as regions.png
  const labels = [];
  regions.forEach((region) => {
    const box = new THREE.Box3();
    const p = new THREE.Vector3();
    region.members.forEach((i) => box.expandByPoint(p.fromArray(positions, 3 * i)));
    if (box.isEmpty()) return;
    box.expandByScalar(extent * 0.01);
    const size = box.getSize(new THREE.Vector3()), middle = box.getCenter(new THREE.Vector3());
    const style = STYLE[region.verdict] || STYLE.skipped;
    const edges = new THREE.EdgesGeometry(new THREE.BoxGeometry(size.x, size.y, size.z));
    const lineMaterial = style.dashed
      ? new THREE.LineDashedMaterial({ color: new THREE.Color(style.color), dashSize: extent * 0.015,
        gapSize: extent * 0.012 })
      : new THREE.LineBasicMaterial({ color: new THREE.Color(style.color) });
    lineMaterial.depthTest = false; // outlines stay visible through the cloud
    const outline = new THREE.LineSegments(edges, lineMaterial);
    outline.renderOrder = 1;
    outline.position.copy(middle);
    if (style.dashed) outline.computeLineDistances();
    scene.add(outline);
    const tag = el("div", "tag " + region.verdict, String(region.id));
    canvasHost.append(tag);
    labels.push({ tag: tag, at: new THREE.Vector3(box.max.x, box.max.y, box.max.z), region: region });
    region.middle = middle;
  });
  regions.forEach((region) => {
    const item = el("li", "region " + region.verdict);
    item.dataset.regionId = String(region.id);
    const head = el("div", "head");
    head.append(el("span", "number " + region.verdict, String(region.id)), el("span", "verdict", region.verdict),
      el("span", "counts", region.point_count + " points, confidence " + fmt(region.confidence)));
    if (region.explanation) item.append(head, el("div", "explanation", region.explanation));
    else item.append(head);
    item.append(el("div", "reason", region.reason));
    if (region.max_distance !== null && region.max_distance !== undefined) {
      item.append(el("div", "distance", "bank distance max " + fmt(region.max_distance) +
        (region.threshold ? " vs threshold " + fmt(region.threshold) : "")));
    }
    item.addEventListener("click", () => {
      if (region.middle) { controls.target.copy(region.middle); controls.update(); }
      document.querySelectorAll("li.region").forEach((other) => other.classList.toggle("chosen", other === item));
    });
    list.append(item);
  });

  // --- picking ---
  const raycaster = new THREE.Raycaster();
  const pointer = new THREE.Vector2();
  const picked = document.getElementById("picked");
  const marker = new THREE.Points(new THREE.BufferGeometry().setAttribute("position",
    new THREE.BufferAttribute(new Float32Array(3), 3)), new THREE.PointsMaterial({ size: 11, sizeAttenuation: false,
    color: 0x00c853 }));
  marker.visible = false;
  scene.add(marker);
  function pick(event) {
    const rect = renderer.domElement.getBoundingClientRect();
    pointer.set(((event.clientX - rect.left) / rect.width) * 2 - 1, -((event.clientY - rect.top) / rect.height) * 2 + 1);
    raycaster.setFromCamera(pointer, camera);
    raycaster.params.Points.threshold = camera.position.distanceTo(controls.target) * 0.01;
    const hits = raycaster.intersectObject(cloud);
    if (!hits.length) return;
    hits.sort((a, b) => a.distanceToRay - b.distanceToRay || a.distance - b.distance);
    const i = hits[0].index;
    marker.geometry.attributes.position.array.set(positions.subarray(3 * i, 3 * i + 3));
    marker.geometry.attributes.position.needsUpdate = true;
    marker.visible = true;
    frame();
    picked.replaceChildren(el("div", "fact", "point " + inputIndex[i] + " (input order, as in scores.npy)"),
      el("div", "fact", "score " + fmt(scores[i])));
    (regionsOf.get(i) || []).forEach((id) => {
      const region = regions.find((r) => r.id === id);
      picked.append(el("div", "fact " + region.verdict, "region " + id + " (" + region.verdict + "): " + region.reason));
    });
    if (!regionsOf.has(i)) picked.append(el("div", "fact", "in no region"));
  }
  let downAt = null;
  renderer.domElement.addEventListener("pointerdown", (e) => { downAt = [e.clientX, e.clientY]; });
  renderer.domElement.addEventListener("pointerup", (e) => {
    if (downAt && Math.hypot(e.clientX - downAt[0], e.clientY - downAt[1]) < 4) pick(e); // a click, not a drag
    downAt = null;
  });
  document.getElementById("point-size").addEventListener("input", (e) => { material.size = Number(e.target.value); });

  // --- draw ---
  function resize() {
    const width = canvasHost.clientWidth, height = canvasHost.clientHeight;
    renderer.setSize(width, height);
    camera.aspect = width / Math.max(height, 1);
    camera.updateProjectionMatrix();
  }
  const projected = new THREE.Vector3();
  function frame() { // drawn on demand: OrbitControls' "change" (its update() fires it), resizes and picks
    renderer.render(scene, camera);
    const width = canvasHost.clientWidth, height = canvasHost.clientHeight;
    labels.forEach(({ tag, at }) => {
      projected.copy(at).project(camera);
      tag.style.display = projected.z < 1 ? "" : "none";
      tag.style.left = ((projected.x + 1) / 2) * width + "px";
      tag.style.top = ((1 - projected.y) / 2) * height + "px";
    });
  }
  window.addEventListener("resize", () => { resize(); frame(); });
  controls.addEventListener("change", frame);
  resize();
  controls.update();
  frame();
  setStatus("rendered", "rendered " + n + " points and " + regions.length + " regions");
})();
