export {
  WebGLRenderer, Scene, PerspectiveCamera, BufferGeometry, BufferAttribute, Points, PointsMaterial,
  Raycaster, Vector2, Vector3, Box3, LineSegments, LineBasicMaterial, LineDashedMaterial, EdgesGeometry,
  BoxGeometry, Color, Sphere,
} from 'three';
export { OrbitControls } from 'three/examples/jsm/controls/OrbitControls.js';
